"""``python -m bench`` argument checks (nothing is measured)."""

from __future__ import annotations

import pytest

from bench.__main__ import main


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "CPU"])
def test_engine_device_that_names_no_device_is_one_line_before_any_section(value, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--engine", f"device={value}", "--list"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m bench: error: --engine: device: unknown device"), err
    assert "--device" not in err  # bench has no --device flag: the hint names the --engine key


def test_engine_good_settings_are_taken(capsys) -> None:
    assert main(["--engine", "device=cpu", "--engine", "cuda_graphs=false", "--list"]) == 0
    assert "decode" in capsys.readouterr().out


def test_engine_device_cuda_without_a_gpu_is_one_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        main(["--engine", "device=cuda", "--list"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m bench: error: --engine: device: device 'cuda' requested but"), err
    assert err.endswith("use device=cpu or auto"), err
