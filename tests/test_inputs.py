"""Bad input gets a clear error, or a documented conversion: never a deep traceback or a silent wrong result."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdipc_lab as S
from sdipc_lab.images import as_rgb_images


def rgb(colour=(200, 30, 30), size=(40, 40)):
    return Image.new("RGB", size, colour)


def test_rgba_is_composited_on_white_with_a_warning():
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 128))
    with pytest.warns(UserWarning, match="transparent"):
        [out] = as_rgb_images(rgba)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((5, 5))
    assert r == 255 and 120 <= g <= 135 and g == b  # half red over white


def test_opaque_rgba_converts_silently(recwarn):
    [out] = as_rgb_images(Image.new("RGBA", (40, 40), (1, 2, 3, 255)))
    assert out.getpixel((0, 0)) == (1, 2, 3) and not recwarn.list


def test_grayscale_and_palette():
    [gray] = as_rgb_images(Image.new("L", (40, 40), 77))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    palette = rgb((10, 200, 30)).convert("P", palette=Image.ADAPTIVE, colors=4)
    [out] = as_rgb_images(palette)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (10, 200, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((40, 40), 65535 // 2, dtype=np.uint16)
    image = Image.fromarray(array)  # mode I;16
    assert image.mode.startswith("I")
    [out] = as_rgb_images(image)
    assert out.getpixel((0, 0)) == (127, 127, 127)


def test_float_image_is_refused():
    with pytest.raises(TypeError, match="mode 'F'"):
        as_rgb_images(Image.fromarray(np.zeros((40, 40), dtype=np.float32)))


def test_tiny_image_is_refused():
    with pytest.raises(ValueError, match="1x1 pixels"):
        as_rgb_images(rgb(size=(1, 1)))


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="not an image file"):
        as_rgb_images(path)
    with pytest.raises(FileNotFoundError, match="no file"):
        as_rgb_images(tmp_path / "missing.png")


def test_paths_and_arrays(tmp_path):
    path = tmp_path / "red.png"
    rgb().save(path)
    [from_path] = as_rgb_images(str(path))
    [from_array] = as_rgb_images(np.asarray(rgb()))
    assert from_path.getpixel((3, 3)) == from_array.getpixel((3, 3)) == (200, 30, 30)
    with pytest.raises(TypeError, match="uint8"):
        as_rgb_images(np.zeros((40, 40, 3), dtype=np.float64))
    with pytest.raises(TypeError, match="torch tensor"):
        as_rgb_images([torch.zeros(3, 40, 40)])


def test_empty_and_wrong_types():
    with pytest.raises(ValueError, match="no images"):
        as_rgb_images([])
    with pytest.raises(TypeError):
        as_rgb_images(None)
    with pytest.raises(TypeError):
        as_rgb_images(42)


def test_errors_reach_the_user_through_the_api(lab):
    with pytest.raises(ValueError, match="no images"):
        S.vary(lab, [])
    with pytest.raises(ValueError, match="1x1"):
        S.image_prompt_embeds(lab, rgb(size=(1, 1)))
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n "):
            S.vary(lab, rgb(), n=n)
    with pytest.raises(ValueError, match="steps"):
        S.vary(lab, rgb(), steps=0)
    with pytest.raises(ValueError, match="tokens long"):
        S.generate(lab, " ".join(["red"] * 90))


@pytest.mark.parametrize("run", ["1e-4", "fast:120", "1e-4:120:2:9", "1e-4:0"])
def test_the_finetune_bench_says_what_a_run_should_look_like(run):
    """`bench/finetune.py --ft-runs lr:steps[:prompts]`: a malformed run is an argparse message, not a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench" / "finetune.py"
    done = subprocess.run([sys.executable, str(bench), "--ft-sweep", "--ft-runs", "1e-4:120", run],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"argument --ft-runs: {run!r}" in done.stderr
    assert "is not lr:steps[:prompts]" in done.stderr or "must be positive" in done.stderr
