"""mmdit: text-to-image diffusion transformers over VQ-VAE latents."""

__all__ = ["TextToImagePipeline"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `python -m mmdit.data.shapes` does not import transformers.
    if name == "TextToImagePipeline":
        from mmdit.pipeline import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'mmdit' has no attribute {name!r}")
