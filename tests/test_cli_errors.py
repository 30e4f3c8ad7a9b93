"""The CLI's answers to bad input: one line naming the problem, no traceback (issue #18 item 9)."""

from __future__ import annotations

import pytest

from fromage.cli import build_parser, main


def test_a_missing_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["caption", str(tmp_path / "cat.png"), "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("fromage caption: error: ") and "nowhere" in err and "Traceback" not in err


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["-v", "caption", "x.png", "--model", str(tmp_path / "nowhere")])


@pytest.mark.parametrize("k", ["0", "-1"])
def test_retrieve_k_must_be_positive(k, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["retrieve", "red apple", "--model", "m", "--index", "i", "-k", k])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_the_api_key_can_come_from_the_environment(monkeypatch):
    import fromage.apps.serve as serve_module

    seen = {}
    monkeypatch.setattr(
        serve_module, "serve", lambda model, index, host, port, config: seen.update(config=config)
    )
    monkeypatch.setenv("FROMAGE_API_KEY", "sesame")
    assert main(["serve", "--model", "m"]) == 0
    assert seen["config"].api_key == "sesame"


def test_version_and_the_top_level_pipeline(capsys):
    """Issue #16: no `--version`; `from fromage import Fromage` failed."""
    import fromage

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fromage {fromage.__version__}"
    from fromage import Fromage
    from fromage.pipeline import Fromage as Pipeline

    assert Fromage is Pipeline


def test_log_lines_go_through_tqdm_while_a_command_runs(monkeypatch):
    """Issue #16: log lines and progress bars interleaved on the terminal."""
    import logging

    from fromage import cli

    seen = []

    def command(parser, args, extra):
        seen.extend(type(h).__name__ for h in logging.getLogger().handlers)
        return 0

    monkeypatch.setattr(cli, "_run", command)
    assert cli.main(["fetch"]) == 0
    assert "_TqdmLoggingHandler" in seen
