"""`segstream segment`: every frame of a real encoded clip, in order, nothing dropped."""

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from server.cli import main
from tests.helpers_video import make_test_video, mux_frames


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


def test_segment_of_a_file_uri_keeps_the_source_rate_and_knows_the_total(tmp_path):
    from pipeline.config import build_config
    from pipeline.offline import segment_file

    clip = make_test_video(tmp_path / "clip.mp4", frames=12, width=64, height=48, fps=12)
    for source in (str(clip), clip.as_uri(), f"{clip.as_uri()}?realtime=0"):
        out = tmp_path / "out.mp4"
        totals: set[int | None] = set()
        report = segment_file(
            build_config({}), source, output=out, model="null", progress=lambda d, t, seen=totals: seen.add(t)
        )
        assert report.frames == 12, source
        assert totals == {12}, source  # the progress bar has its total
        with av.open(str(out)) as c:
            assert c.streams.video[0].average_rate == 12, source


def test_segment_output_is_checked_before_any_work(tmp_path, capsys):
    clip = make_test_video(tmp_path / "clip.mp4", frames=6, width=64, height=48, fps=12)
    masks = tmp_path / "masks"
    for bad, needle in [
        (tmp_path / "out_noext", "FFmpeg knows no video container for a name without an extension"),
        (tmp_path / "out.xyz", "FFmpeg knows no video container for the extension '.xyz'"),
        (tmp_path / "out.wav", "the wav container cannot hold H.264 video"),
        (tmp_path, "is a directory"),
    ]:
        argv = ["segment", str(clip), "-o", str(bad), "--masks-dir", str(masks), "--model", "null", "-q"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and str(bad) in err and err.count("\n") == 1, err
        assert not masks.exists()  # nothing written
    # Missing parent directories are created, as for --masks-dir.
    out = tmp_path / "new" / "sub" / "out.mp4"
    assert main(["segment", str(clip), "-o", str(out), "--model", "null", "-q"]) == 0
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


def test_odd_sized_input_is_padded_to_even_in_the_video_and_kept_in_the_masks(tmp_path, capsys):
    clip = tmp_path / "odd.mkv"
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (39, 53, 3), dtype=np.uint8) for _ in range(4)]
    with av.open(str(clip), mode="w") as c:
        s = c.add_stream("ffv1", rate=12)  # lossless, and odd sizes are fine in 4:4:4
        s.width, s.height, s.pix_fmt = 53, 39, "yuv444p"
        mux_frames(c, s, frames)
    out, masks = tmp_path / "out.mp4", tmp_path / "m"
    code = main(["segment", str(clip), "-o", str(out), "--masks-dir", str(masks), "--model", "null", "-q"])
    assert code == 0, capsys.readouterr().err
    assert cv2.imread(str(masks / "00000.png"), cv2.IMREAD_UNCHANGED).shape == (39, 53)
    with av.open(str(out)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert first.shape == (40, 54, 3)  # one column and one row added, none lost
    # The null model predicts background, so the overlay is the frame: the padding repeats the edge.
    edge = np.abs(first[:39, 53].astype(int) - first[:39, 52].astype(int)).mean()
    inner = np.abs(first[:39, 51].astype(int) - first[:39, 52].astype(int)).mean()
    assert edge < inner / 2


def test_segment_with_unreadable_weights_writes_nothing(tmp_path, capsys):
    clip = make_test_video(tmp_path / "c.mp4", frames=3)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\xff" * 64)
    masks, out = tmp_path / "masks", tmp_path / "out" / "o.mp4"
    code = main(["segment", str(clip), "--weights", str(weights), "--masks-dir", str(masks),
                 "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "w.safetensors" in err and err.count("\n") == 1, err
    assert not masks.exists() and not out.parent.exists()  # refused before any directory is made


@pytest.mark.parametrize(
    ("sizes", "bars"),
    [(((160, 120), (96, 80)), "sides"),  # 96x80 scaled by 1.5 is 144x120: 8 columns each side
     (((96, 80), (160, 120)), "top")],  # 160x120 scaled by 0.6 is 96x72: 4 rows top and bottom
)
def test_segment_of_a_source_that_changes_its_size_midway_fits_the_later_pictures(tmp_path, sizes, bars):
    """A transport stream whose pictures change size midway (a camera switching streams): the
    video keeps the first size, the later pictures are scaled into it on black."""
    from pipeline.config import build_config
    from pipeline.offline import segment_file

    parts = [make_test_video(tmp_path / f"{w}.ts", frames=10, width=w, height=h, fps=10) for w, h in sizes]
    joined = tmp_path / "joined.ts"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    out, masks = tmp_path / "out.mp4", tmp_path / "masks"
    report = segment_file(build_config({}), str(joined), output=out, masks_dir=masks, model="null")
    assert report.frames == 20
    with av.open(str(out)) as c:
        pictures = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    (w0, h0) = sizes[0]
    assert len(pictures) == 20 and {p.shape for p in pictures} == {(h0, w0, 3)}
    last = pictures[-1].astype(int)
    edges = (last[:, :6], last[:, -6:]) if bars == "sides" else (last[:3], last[-3:])
    assert max(e.mean() for e in edges) < 12 and last[h0 // 4 : -h0 // 4, w0 // 4 : -w0 // 4].mean() > 40
    assert {Image.open(p).size for p in masks.glob("*.png")} == set(sizes)  # masks: the source's size
