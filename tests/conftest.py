import os

# Tests never touch the network: a hub look-up must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The precision every training run of the suite uses: "no" (fp32, the default, the same on every CPU) or
# MMDIT_TEST_PRECISION=bf16, which exercises the bf16 path on purpose, also where bf16 is not native.
PRECISION = os.environ.get("MMDIT_TEST_PRECISION", "no")
if PRECISION not in ("no", "bf16"):
    raise ValueError(f"MMDIT_TEST_PRECISION={PRECISION!r}; accepted: no, bf16")


def tolerance(fp32: float, bf16: float) -> float:
    """A comparison's tolerance in the suite's precision: each test names both (bf16 rounds at 2^-8, not 2^-24,
    so results that differ only in summation order differ by far more)."""
    return bf16 if PRECISION == "bf16" else fp32


@pytest.fixture
def suite_precision():
    """Runs a test of a model itself in the suite's precision: under bf16 autocast with MMDIT_TEST_PRECISION=bf16,
    as the trainer runs it (a no-op otherwise). Without autocast's weight cache: a test that takes optimizer steps
    inside must not see the cached bf16 copies of the weights from before the step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16", cache_enabled=False):
        yield


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny models: intra-op threading only adds overhead, and on a busy 2-core machine
    thread hand-offs make each step ~50x slower. Restored afterwards for the rest of the suite."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A whole default pipeline, shrunk to run in seconds: shapes data -> captions -> VQ-VAE -> DiT -> export.
TINY = [
    "data.num_images=120", "data.holdout=[yellow triangle]",
    "vqvae.channels=8", "vqvae.channel_mult=[1, 2]", "vqvae.patch_size=2", "vqvae.codebook_size=32",
    "vqvae.code_dim=4", "vqvae_train.batch_size=8", "vqvae_train.steps=20", "vqvae_train.log_every=5",
    "vqvae_train.image_every=10", "vqvae_train.checkpoint_every=10",
    "dit.width=32", "dit.depth=2", "dit.heads=2", "dit_train.batch_size=8", "dit_train.steps=10",
    "dit_train.log_every=5", "dit_train.image_every=10", "dit_train.checkpoint_every=5",
    "dit_train.sample_prompts=[a red circle, a small blue square in the bottom right]", "sample.steps=2",
    f"train.mixed_precision={PRECISION}",
]


def tiny_args(root, *extra):
    return ["--config", "configs/shapes.yaml", f"data.path={root}/data", f"train.output_dir={root}/run",
            f"train.cache_dir={root}/cache", *TINY, *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained-and-exported tiny run directory, shared by the tests that only read it."""
    from train.train import main

    root = tmp_path_factory.mktemp("tiny")
    main(tiny_args(root))
    return root / "run"


@pytest.fixture(scope="session")
def tiny_masked_run(tiny_run, tmp_path_factory):
    """tiny_run's data, caption cache and VQ-VAE, with a DiT trained by the masked objective instead."""
    import shutil

    from train.train import main

    root = tmp_path_factory.mktemp("tiny-masked")
    shutil.copytree(tiny_run.parent, root, dirs_exist_ok=True)
    shutil.rmtree(root / "run" / "dit")
    (root / "run" / "pipeline.json").unlink()
    main(tiny_args(root, "train.stage=dit", "dit.objective=masked"))
    return root / "run"
