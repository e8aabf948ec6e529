"""`segstream segment`: every frame of a real encoded clip, in order, nothing dropped."""

import av
import cv2
import numpy as np

from server.cli import main
from tests.helpers_video import make_test_video


def test_segment_writes_one_label_png_per_frame_and_a_video(tmp_path, capsys):
    clip = make_test_video(tmp_path / "clip.mp4", frames=24, width=96, height=64, fps=24)
    masks = tmp_path / "masks"
    out = tmp_path / "out.mp4"
    code = main(["segment", str(clip), "--masks-dir", str(masks), "--output", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    files = sorted(p.name for p in masks.iterdir())
    assert files == [f"{i:05d}.png" for i in range(24)]
    for name in files[:3]:
        labels = cv2.imread(str(masks / name), cv2.IMREAD_UNCHANGED)
        assert labels.shape == (64, 96) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1}
    with av.open(str(out)) as c:
        decoded = sum(1 for _ in c.decode(video=0))
    assert decoded == 24
    assert "segmented 24 frames" in capsys.readouterr().out


def test_segment_with_the_null_model_is_exact_and_fast(tmp_path, capsys):
    clip = make_test_video(tmp_path / "clip.mp4", frames=90, width=64, height=48, fps=30)
    masks = tmp_path / "m"
    assert main(["segment", str(clip), "--masks-dir", str(masks), "--model", "null", "--quiet"]) == 0
    assert len(list(masks.glob("*.png"))) == 90


def test_segment_of_garbage_fails_with_one_line(tmp_path, capsys):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    code = main(["segment", str(bad), "--masks-dir", str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "garbage.mp4" in err and err.count("\n") == 1
