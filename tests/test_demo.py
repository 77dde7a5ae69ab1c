"""The demo: its functions alone, then the served page in headless Chromium (Playwright) and its endpoints through
gradio_client. The browser is Debian's chromium (.ci/run installs it); Playwright's own download is not used."""
import io
import os
import shutil
import socket

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmdit.demo import Settings, call_arguments, cli, editor_inputs, generate, run_header
from mmdit.pipeline import TextToImagePipeline

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
CHROMIUM = os.environ.get("MMDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "a large red circle in the top left"


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return TextToImagePipeline.from_pretrained(tiny_run)


def settings(**changes) -> Settings:
    return Settings(**{"prompts": PROMPT, "steps": 2, "guidance": 2.0, "seed": 0, **changes})


def input_image() -> Image.Image:
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((3, 3, 15, 15), fill=(255, 0, 0))
    return image


@pytest.mark.parametrize("changes, says", [
    (dict(prompts=" \n  \n"), "the prompt is empty; accepted: one prompt per line"),
    (dict(steps=0), "steps=0; accepted: an integer from 1 to 1000"),
    (dict(steps=2.5), "steps=2.5; accepted: an integer from 1 to 1000"),
    (dict(steps=None), "steps is empty; accepted: a number"),
    (dict(num_images=17), "number of images=17; accepted: an integer from 1 to 16"),
    (dict(seed=-1), "seed=-1; accepted: an integer from 0 to 2**64 - 1"),
    (dict(guidance=float("nan")), "guidance_scale=nan; accepted: a finite number >= 0"),
    (dict(sampler="maskgit"), "sampler='maskgit' does not sample a flow run; accepted: euler, heun"),
])
def test_bad_settings_are_one_line_naming_the_value(pipe, changes, says):
    with pytest.raises(ValueError) as e:
        call_arguments(pipe, settings(**changes))
    assert says in str(e.value) and "\n" not in str(e.value)


def test_generate_text_image_and_inpainting(pipe):
    images, info = generate(pipe, settings(prompts=f"{PROMPT}\na small blue square", num_images=2.0))
    assert len(images) == 4 and all(im.size == (32, 32) for im in images)
    assert info.startswith("4 text-to-image image(s) of 32x32 in ") and "seed 0, 2 euler steps, guidance 2" in info
    again, _ = generate(pipe, settings(prompts=f"{PROMPT}\na small blue square", num_images=2))
    assert [im.tobytes() for im in images] == [im.tobytes() for im in again]  # seeded
    _, info = generate(pipe, settings(random_seed=True, seed=None))
    assert "seed " in info
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))
    (out,), info = generate(pipe, settings(), image=input_image(), mask=mask, strength=1.0)
    a, b = np.array(out), np.array(input_image())
    assert info.startswith("1 inpainted image(s)") and (a[:, :16] == b[:, :16]).all()
    with pytest.raises(ValueError, match="a mask was given without an image; accepted: upload the image"):
        generate(pipe, settings(), mask=mask)
    with pytest.raises(ValueError, match=r"strength=0; accepted: a number in \(0, 1\]"):
        generate(pipe, settings(), image=input_image(), strength=0)


def test_editor_value_becomes_image_and_mask():
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # the brush layer, at another size than the image
    ImageDraw.Draw(layer).rectangle((32, 0, 63, 63), fill=(255, 0, 0, 150))
    image, mask = editor_inputs({"background": input_image().convert("RGBA"), "layers": [layer], "composite": None})
    assert image.mode == "RGB" and mask.size == (32, 32)
    assert (np.array(mask)[:, 16:] == 255).all() and (np.array(mask)[:, :16] == 0).all()
    assert editor_inputs({"background": input_image(), "layers": [], "composite": None})[1] is None
    assert editor_inputs(None) == (None, None)
    for blank in (Image.new("RGBA", (32, 32), (0, 0, 0, 0)), Image.new("RGBA", (800, 800), "white")):
        assert editor_inputs({"background": blank, "layers": [layer], "composite": None})[0] is None  # no upload
    white = Image.new("RGB", (32, 32), "white")  # a white picture uploaded: an image to inpaint
    assert editor_inputs({"background": white, "layers": [layer], "composite": None})[0].size == (32, 32)


def test_header_names_the_objective(pipe, tiny_run, tiny_masked_run):
    assert "**flow** objective (rectified flow), 32x32 images" in run_header(pipe, tiny_run)
    masked = TextToImagePipeline.from_pretrained(tiny_masked_run)
    assert "**masked** objective (masked-token generation (MaskGIT))" in run_header(masked, tiny_masked_run)
    images, info = generate(masked, settings(sampler=None, temperature=0.7, randomness=4.5))
    assert images[0].size == (32, 32) and "2 maskgit steps, guidance 2" in info


def test_cli_refuses_a_bad_run_and_port(tmp_path, capsys):
    assert cli(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not an exported mmdit run" in err and "\n" not in err
    assert cli(["--model", str(tmp_path), "--port", "70000"]) == 2
    assert "--port=70000; accepted: an integer from 1 to 65535" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, single_thread):
    pytest.importorskip("gradio")
    from mmdit.demo import launch

    port = free_port()
    demo = launch(tiny_run, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        outside = []  # the page may ask nothing of any other host (fonts, analytics, CDNs)
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(server)
                   else (outside.append(r.request.url), r.abort()))
        page.goto(server)
        page.get_by_text("objective (rectified flow)").wait_for(timeout=30_000)
        yield page
        browser.close()
        assert outside == []


def gallery_images(page, server) -> list[Image.Image]:
    """The gallery's images as the server sent them, once they have loaded."""
    page.wait_for_function("() => { const i = document.querySelector('#gallery img'); "
                           "return i && i.complete && i.naturalWidth > 0 }", timeout=30_000)
    images = []
    for src in page.locator("#gallery img").evaluate_all("imgs => imgs.map(i => i.src)"):
        assert src.startswith(server)
        images.append(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
    return images


def shows_error(page, says: str) -> None:
    toast = page.locator(".toast-body").filter(has_text=says)
    toast.first.wait_for(timeout=15_000)
    assert "Traceback" not in page.content()
    page.locator(".toast-close").first.click()  # dismissed, so the next check sees only its own message


def test_browser_text_to_image(page, server, tiny_run):
    assert "10 DiT" in page.locator("#header").inner_text()  # the run's training summary
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#steps input").fill("2")
    page.locator("#generate").click()
    images = gallery_images(page, server)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert page.locator("#gallery img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 32]
    assert "1 text-to-image image(s) of 32x32" in page.locator("#info").inner_text()

    page.locator("#steps input").fill("0")
    page.locator("#generate").click()
    shows_error(page, "steps=0; accepted: an integer from 1 to 1000")
    page.locator("#steps input").fill("2")
    page.locator("#prompt textarea").fill("")
    page.locator("#generate").click()
    shows_error(page, "the prompt is empty")


def brush(page, box: dict, xs: list[float], y0: float, y1: float) -> None:
    """Vertical strokes at the canvas fractions xs, from y0 to y1 of its height. Few pointer events: the canvas
    repaints on each, slowly in software rendering."""
    for x in xs:
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y0)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y1, steps=3)
        page.mouse.up()


def test_browser_inpainting(page, server, tmp_path):
    page.locator("#prompt textarea").fill("a small blue square in the bottom right")
    page.get_by_role("tab", name="Inpainting").click()
    canvas = page.locator("#editor .pixi-target canvas")
    canvas.wait_for()
    input_image().save(tmp_path / "in.png")
    page.locator("#editor input[type=file]").set_input_files(str(tmp_path / "in.png"))
    page.locator("#editor").get_by_text("select the draw tool to start").wait_for(state="hidden")  # shown: uploaded
    page.locator("#generate-inpaint").click()
    shows_error(page, "the mask is empty; accepted: brush the region to repaint")
    # At this viewport the editor shows the 32-pixel image centred at 900%, over 0.26 to 0.74 of the canvas' width:
    # strokes at 0.56 and 0.65 paint about its columns 20 and 26, +-4 (the brush's radius at this resolution).
    # They start below the editor's zoom toolbar, which lies over the canvas' top and takes the clicks there.
    brush(page, canvas.bounding_box(), [0.56, 0.65], 0.15, 0.8)
    page.wait_for_timeout(500)
    page.locator("#generate-inpaint").click()
    page.get_by_text("1 inpainted image(s) of 32x32").wait_for(timeout=30_000)
    (out,) = gallery_images(page, server)
    a, b = np.array(out), np.array(input_image())
    assert out.size == (32, 32)
    assert (a[:, :12] == b[:, :12]).all()  # left of the brushed strokes: the input's pixels, pasted back
    assert (a[:, 20:27] != b[:, 20:27]).any()  # under them: repainted
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    page.locator("#editor button[aria-label='Clear canvas']").click()
    page.locator("#editor button[aria-label='Brush']").click()
    brush(page, canvas.bounding_box(), [0.5], 0.2, 0.8)  # a mask on the editor's empty canvas, no image
    page.locator("#generate-inpaint").click()
    shows_error(page, "a mask was given without an image")


def test_gradio_client_endpoints(server, tmp_path):
    client_module = pytest.importorskip("gradio_client")
    client = client_module.Client(server, verbose=False)
    values = [PROMPT, "", 2, 2.0, 0, False, 2, "euler", True, 0.7, 4.5]
    gallery, info = client.predict(*values, api_name="/text_to_image")
    assert len(gallery) == 2 and info.startswith("2 text-to-image image(s) of 32x32")
    assert all(Image.open(item["image"]).size == (32, 32) for item in gallery)

    input_image().save(tmp_path / "in.png")
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    mask.paste((255, 0, 0, 255), (16, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    editor = {"background": client_module.handle_file(str(tmp_path / "in.png")),
              "layers": [client_module.handle_file(str(tmp_path / "mask.png"))], "composite": None}
    gallery, info = client.predict(*values[:6], 1, *values[7:], editor, 1.0, True, api_name="/inpaint")
    out = np.array(Image.open(gallery[0]["image"]).convert("RGB"))
    assert info.startswith("1 inpainted image(s)") and (out[:, :16] == np.array(input_image())[:, :16]).all()
    gallery, _ = client.predict(*values[:6], 1, *values[7:], client_module.handle_file(str(tmp_path / "in.png")),
                                0.5, api_name="/image_to_image")
    assert Image.open(gallery[0]["image"]).size == (32, 32)
    with pytest.raises(Exception, match="steps=0; accepted: an integer from 1 to 1000"):
        client.predict(PROMPT, "", 0, *values[3:], api_name="/text_to_image")
