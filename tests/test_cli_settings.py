"""CLI settings of `train`, `chat` and `serve` come from their config dataclasses through tyro:
one default and one description per setting, where it is defined."""

from __future__ import annotations

import dataclasses

import pytest

from fromage.cli import build_parser, main, settings
from fromage.config import ChatConfig, ServeConfig


def _parsed(cls, argv: list[str]):
    args, extra = build_parser().parse_known_args(argv)
    return settings(cls, cls(), args, extra, "")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and its bases (a subclass's wins)."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    # tyro draws boxes and wraps lines: compare words only.
    return " ".join(capsys.readouterr().out.replace("│", " ").split())


def test_flag_defaults_are_the_dataclass_defaults():
    assert _parsed(ServeConfig, ["serve"]) == ServeConfig()
    assert _parsed(ChatConfig, ["chat", "--model", "m"]) == ChatConfig()


def test_flags_set_fields_and_list_flags_take_several_values():
    config = _parsed(
        ServeConfig,
        [
            "serve",
            "--port",
            "9",
            "--max-images-per-request",
            "3",
            "--allowed-image-hosts",
            "a.test",
            "b.test",
        ],
    )
    assert config.max_images_per_request == 3
    assert config.allowed_image_hosts == ("a.test", "b.test")
    chat = _parsed(ChatConfig, ["chat", "--model", "m", "--ret-scale-factor", "2"])
    assert chat.ret_scale_factor == 2.0 and chat.memory == ChatConfig.memory


@pytest.mark.parametrize(("command", "cls"), [("serve", ServeConfig), ("chat", ChatConfig)])
def test_help_lists_every_setting_with_its_docstring(command, cls, capsys):
    text = _help(command, capsys)
    assert "--model" in text  # the command's own flags come first
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        assert "--" + field.name.replace("_", "-") in text, field.name
        assert field.name in docs, f"{cls.__name__}.{field.name} has no docstring"
        assert docs[field.name][:40] in text, field.name


def test_inherited_settings_keep_their_docstrings(capsys):
    docs = field_docs(ChatConfig)
    assert docs["top_p"].startswith("Sample only from")  # from GenerationConfig
    assert "chat answers requests" in docs["ret_scale_factor"]  # ChatConfig's own wins
    text = _help("chat", capsys)
    assert docs["top_p"][:40] in text and docs["ret_scale_factor"][:40] in text


def test_one_flag_vocabulary(capsys):
    """Issue #16: -v only worked before the subcommand; --out/--output-dir/--save named one idea;
    `serve --max-images` meant images in, the request's `max_images` images out."""
    parser = build_parser()
    assert parser.parse_known_args(["train", "-v"])[0].verbose is True
    assert parser.parse_args(["caption", "a.png", "-v"]).verbose is True
    assert parser.parse_args(["chat", "--out", "t.html"]).save == "t.html"
    assert parser.parse_args(["demo", "--out", "d.html"]).save == "d.html"
    with pytest.raises(SystemExit):  # no prefix abbreviations either
        _parsed(ServeConfig, ["serve", "--max-images", "3"])
    assert "--max-images" in capsys.readouterr().err


def test_the_lm_weight_storage_is_a_choice(capsys):
    assert _parsed(ServeConfig, ["serve", "--lm-weights", "int8"]).lm_weights == "int8"
    assert ServeConfig().lm_weights == "bfloat16"
    with pytest.raises(SystemExit):
        _parsed(ServeConfig, ["serve", "--lm-weights", "int4"])
    assert build_parser().parse_args(["chat", "--lm-weights", "float32"]).lm_weights == "float32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["caption", "a.png", "--lm-weights", "fp8"])


def test_a_list_setting_given_twice_is_refused_not_cut_to_its_last_value():
    with pytest.raises(ValueError, match="--allowed-image-hosts given more than once"):
        _parsed(ServeConfig, ["serve", "--allowed-image-hosts", "a.test", "--allowed_image_hosts=b.test"])
    assert _parsed(ChatConfig, ["chat", "--stop", "Q:", "x"]).stop == ("Q:", "x")


@pytest.mark.parametrize(
    ("command", "cls", "flag", "other"),
    [
        ("serve", ServeConfig, "--max-body-bytes", "--max-prompt-tokens"),
        ("chat", ChatConfig, "--memory", "--max-rets"),
    ],
)
def test_print_config_and_config_files_for_every_settings_command(
    command, cls, flag, other, tmp_path, capsys
):
    assert main([command, "--print-config", flag, "7"]) == 0  # prints and exits: no model loaded
    path = tmp_path / "settings.json"
    path.write_text(capsys.readouterr().out)
    field, other_field = flag[2:].replace("-", "_"), other[2:].replace("-", "_")
    assert getattr(_parsed(cls, [command, "--config", str(path)]), field) == 7
    later = _parsed(cls, [command, "--config", str(path), other, "3"])  # flags after a file still apply
    assert getattr(later, field) == 7 and getattr(later, other_field) == 3
    assert later == _parsed(cls, [command, flag, "7", other, "3"])  # tuples stay tuples through JSON
