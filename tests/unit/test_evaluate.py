"""``segstream eval`` on a tiny generated DAVIS-style sequence, with a fake segmenter."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest

from models.temporal import TemporalParams
from pipeline.evaluate import (
    EvalInputError,
    add_eval_parser,
    evaluate,
    load_sequence,
    run_eval,
)
from tests.helpers_video import mux_frames
from tests.unit.test_temporal import FakeSegmenter, make_scene


def write_davis(tmp_path, n=8, *, moving=True, video=False):
    frames, masks = make_scene(n, moving=moving)
    fdir, mdir = tmp_path / "JPEGImages", tmp_path / "Annotations"
    fdir.mkdir()
    mdir.mkdir()
    for i, (f, m) in enumerate(zip(frames, masks, strict=True)):
        # PNG frames keep the test lossless; JPEG is read the same way.
        cv2.imwrite(str(fdir / f"{i:05d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(mdir / f"{i:05d}.png"), m.astype(np.uint8) * 255)
    return fdir, mdir, frames, masks


def parse(argv):
    parser = argparse.ArgumentParser(prog="segstream")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_eval_json_reports_the_three_scores(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path)
    args = parse(["eval", str(fdir), str(mdir), "--temporal", "keyframe", "--json"])
    assert args.handler is run_eval
    assert run_eval(args, load_segmenter=lambda a: FakeSegmenter()) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou", "flicker", "full_frac"} <= out.keys()
    assert 0.8 < out["miou"] <= 1.0
    assert 0.0 <= out["flicker"] < 0.05
    assert 0.0 < out["full_frac"] <= 1.0 and out["frames"] == 8


def test_eval_table_output(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path, n=4)
    assert run_eval(parse(["eval", str(fdir), str(mdir)]), load_segmenter=lambda a: FakeSegmenter()) == 0
    out = capsys.readouterr().out
    assert "mean IoU" in out and "flicker" in out and "full_frac" in out


def test_evaluate_scores_match_a_hand_count():
    frames, masks = make_scene(6)
    seg = FakeSegmenter(logit_noise=0.0)
    res = evaluate(frames, masks, seg, TemporalParams(mode="off"))
    preds = [
        seg.postprocess(seg.infer(seg.preprocess([f])), [m.shape])[0][0] == 1
        for f, m in zip(frames, masks, strict=True)
    ]
    ious = [np.count_nonzero(p & m) / np.count_nonzero(p | m) for p, m in zip(preds, masks, strict=True)]
    steady = sum(np.count_nonzero(a == b) for a, b in zip(masks, masks[1:], strict=False))
    changed = sum(
        np.count_nonzero((p0 != p1) & (g0 == g1))
        for p0, p1, g0, g1 in zip(preds, preds[1:], masks, masks[1:], strict=False)
    )
    assert res["miou"] == pytest.approx(np.mean(ious))
    assert res["flicker"] == pytest.approx(changed / steady)
    assert res["full_frac"] == 1.0 and res["full_frames"] == 6


def test_keyframe_segments_fewer_frames_on_a_static_sequence():
    # Carrying one noisy mask forward scores like one draw of the model's noise, so the
    # IoU cost is averaged over a few scenes.
    drops = []
    for seed in range(4):
        frames, masks = make_scene(12, moving=False, seed=seed)
        off = evaluate(frames, masks, FakeSegmenter(logit_noise=0.4), TemporalParams(mode="off"))
        key = evaluate(frames, masks, FakeSegmenter(logit_noise=0.4), TemporalParams(mode="keyframe"))
        assert key["full_frac"] <= 0.5 * off["full_frac"]
        drops.append(off["miou"] - key["miou"])
    assert np.mean(drops) <= 0.01


def encode_video(av, path, frames, *, rotation: float = 0, cover: bool = False):
    """A lossless H.264 file of ``frames`` (RGB), with a display rotation when asked for, and
    (``cover``, Matroska) a one-picture cover stored as the first video stream."""
    with av.open(str(path), "w") as c:
        art = c.add_stream("mjpeg", rate=1) if cover else None  # every stream before any packet
        s = c.add_stream("libx264", rate=10 if not cover else 5)  # with a cover: both 1 s long
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv444p"
        s.options = {"qp": "0", "preset": "ultrafast"}
        if rotation:
            s.set_display_rotation(rotation)
        if art is not None:
            art.width, art.height, art.pix_fmt = s.width, s.height, "yuvj420p"
            mux_frames(c, art, frames[:1])
        mux_frames(c, s, frames)
    return path


@pytest.mark.parametrize(
    ("name", "layout"),
    [
        ("clip.mp4", "plain"),
        # a phone video stored sideways (rotation 90: a player turns it counter-clockwise):
        # its ground truth is drawn on the upright picture a player shows
        ("phone.mp4", "sideways"),
        # a Matroska cover picture stored as the first video stream: the frames counted
        # against the masks are the film's
        ("film.mkv", "cover"),
    ],
)
def test_eval_reads_a_video_file_as_the_server_shows_it(tmp_path, capsys, name, layout):
    av = pytest.importorskip("av")
    frames, masks = make_scene(5, moving=False)
    if layout == "sideways":
        stored = [np.ascontiguousarray(np.rot90(f, -1)) for f in frames]
        video = encode_video(av, tmp_path / name, stored, rotation=90)
    else:
        video = encode_video(av, tmp_path / name, frames, cover=layout == "cover")
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for i, m in enumerate(masks):
        cv2.imwrite(str(mdir / f"{i:05d}.png"), m.astype(np.uint8) * 255)
    args = parse(["eval", str(video), str(mdir), "--json"])
    assert run_eval(args, load_segmenter=lambda a: FakeSegmenter()) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["frames"] == 5 and out["miou"] > 0.7


def test_missing_dir_is_one_clear_line_and_exit_2(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path, n=3)
    loaded = []
    code = run_eval(parse(["eval", str(tmp_path / "nope"), str(mdir)]), load_segmenter=loaded.append)
    err = capsys.readouterr().err
    assert code == 2 and not loaded  # input is checked before any model is loaded
    assert err.count("\n") == 1 and "frames not found" in err and "nope" in err
    assert run_eval(parse(["eval", str(fdir), str(tmp_path / "gone")]), load_segmenter=loaded.append) == 2
    assert "masks directory not found" in capsys.readouterr().err


def test_mismatched_counts_and_names_are_refused(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path, n=4)
    (mdir / "00003.png").unlink()
    assert run_eval(parse(["eval", str(fdir), str(mdir)]), load_segmenter=lambda a: FakeSegmenter()) == 2
    assert "4 frames" in capsys.readouterr().err
    (mdir / "00003.png").write_bytes((mdir / "00002.png").read_bytes())
    (mdir / "00002.png").rename(mdir / "99999.png")
    with pytest.raises(EvalInputError, match="no mask .* for frame 00002"):
        load_sequence(fdir, mdir)


def test_bad_threshold_and_unknown_model_exit_2(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path, n=2)
    assert run_eval(parse(["eval", str(fdir), str(mdir), "--blend", "1.5"])) == 2
    assert "blend" in capsys.readouterr().err

    def unknown(args):
        raise KeyError(f"unknown model {args.model!r}")

    assert run_eval(parse(["eval", str(fdir), str(mdir), "--model", "nope"]), load_segmenter=unknown) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_evaluate_refuses_mismatched_streams():
    frames, masks = make_scene(3)
    with pytest.raises(EvalInputError, match="more frames than masks"):
        evaluate(frames, masks[:2], FakeSegmenter(), TemporalParams())
    with pytest.raises(EvalInputError, match="more masks than frames"):
        evaluate(frames[:2], masks, FakeSegmenter(), TemporalParams())


def test_mask_formats_grey_palette_rgb_and_rgba_read_the_same_foreground(tmp_path):
    from PIL import Image

    from pipeline.evaluate import read_mask

    truth = np.zeros((6, 8), bool)
    truth[1:4, 2:7] = True
    grey = truth.astype(np.uint8) * 255
    paths = {}
    paths["grey"] = tmp_path / "grey.png"
    cv2.imwrite(str(paths["grey"]), grey)
    paths["palette"] = tmp_path / "palette.png"
    pal = Image.fromarray(truth.astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.save(paths["palette"])
    paths["rgb"] = tmp_path / "rgb.png"
    cv2.imwrite(str(paths["rgb"]), np.dstack([np.zeros_like(grey), grey, np.zeros_like(grey)]))
    # White on black, fully opaque: the alpha says nothing about the mask.
    paths["rgba_opaque"] = tmp_path / "rgba_opaque.png"
    cv2.imwrite(str(paths["rgba_opaque"]), np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    # Black everywhere, the object only in the alpha channel: the alpha is the mask.
    paths["rgba_alpha"] = tmp_path / "rgba_alpha.png"
    zero = np.zeros_like(grey)
    cv2.imwrite(str(paths["rgba_alpha"]), np.dstack([zero, zero, zero, grey]))
    paths["grey_alpha"] = tmp_path / "grey_alpha.png"
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(paths["grey_alpha"])
    for name, path in paths.items():
        assert np.array_equal(read_mask(path), truth), name
    # Black and opaque everywhere: an empty mask, not a full one.
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.dstack([zero, zero, zero, np.full_like(grey, 255)]))
    assert not read_mask(empty).any()


def test_eval_scores_rgba_masks_like_the_grey_ones(tmp_path, capsys):
    fdir, mdir, _, masks = write_davis(tmp_path, n=4)
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for i, m in enumerate(masks):
        grey = m.astype(np.uint8) * 255
        cv2.imwrite(str(rgba / f"{i:05d}.png"), np.dstack([grey, grey, grey, np.full_like(grey, 255)]))
    scores = []
    for folder in (mdir, rgba):
        assert run_eval(parse(["eval", str(fdir), str(folder), "--json"]),
                        load_segmenter=lambda a: FakeSegmenter()) == 0
        scores.append(json.loads(capsys.readouterr().out)["miou"])
    assert scores[0] > 0.8 and scores[1] == scores[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--roi-full-every", "0"], "--roi-full-every 0: Input should be greater than or equal to 1"),
        (["--roi-max-regions", "99"], "--roi-max-regions 99: Input should be less than or equal to 16"),
    ],
)
def test_bad_roi_flags_are_one_line_naming_the_flag(tmp_path, capsys, flags, needle):
    fdir, mdir, _, _ = write_davis(tmp_path, n=2)
    loaded = []
    assert run_eval(parse(["eval", str(fdir), str(mdir), "--roi", *flags]), load_segmenter=loaded.append) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "http" not in err, err
    assert not loaded  # refused before any model is loaded


def test_roi_flags_without_roi_are_refused(tmp_path, capsys):
    fdir, mdir, _, _ = write_davis(tmp_path, n=2)
    assert run_eval(parse(["eval", str(fdir), str(mdir), "--roi-full-every", "3"]), load_segmenter=list) == 2
    assert "--roi-full-every applies to ROI mode only: add --roi" in capsys.readouterr().err


@pytest.mark.parametrize("roi", [False, True])
def test_eval_warms_the_model_up_on_any_device(monkeypatch, tmp_path, roi):
    """The model's first call (tracing on a CPU, graph capture on a GPU) happens before the
    first frame, so ``model_ms`` is the model's time per frame, not its start-up."""
    import torch

    from models.segmenter import Segmenter
    from pipeline.evaluate import _load_segmenter

    warmed = []

    class Loaded:
        device = torch.device("cpu")

        def warmup(self, batch_sizes):
            warmed.append(list(batch_sizes))

    monkeypatch.setattr(Segmenter, "from_name", classmethod(lambda cls, *a, **k: Loaded()))
    fdir, mdir, _, _ = write_davis(tmp_path, n=2)
    argv = ["eval", str(fdir), str(mdir)] + (["--roi", "--roi-max-regions", "3"] if roi else [])
    _load_segmenter(parse(argv))
    assert warmed == [[1, 2, 3, 4] if roi else [1]]  # up to 3 crops and the frame per batch
