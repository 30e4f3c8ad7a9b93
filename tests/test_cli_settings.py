"""CLI flags of `chat` and `serve` come from their config dataclasses: one default per setting."""

import dataclasses

from fromage.cli import build_parser, settings_from
from fromage.config import ChatConfig, ServeConfig, field_docs


def test_flag_defaults_are_the_dataclass_defaults():
    parser = build_parser()
    assert settings_from(parser.parse_args(["serve"]), ServeConfig) == ServeConfig()
    assert settings_from(parser.parse_args(["chat", "--model", "m"]), ChatConfig) == ChatConfig()


def test_flags_set_fields_and_repeatable_flags_make_tuples():
    args = build_parser().parse_args(
        [
            "serve",
            "--max-images-per-request",
            "3",
            "--allow-image-host",
            "a.test",
            "--allowed-image-hosts",
            "b.test",
        ]
    )
    config = settings_from(args, ServeConfig)
    assert config.max_images_per_request == 3
    assert config.allowed_image_hosts == ("a.test", "b.test")
    chat = settings_from(
        build_parser().parse_args(["chat", "--model", "m", "--ret-scale-factor", "2"]), ChatConfig
    )
    assert chat.ret_scale_factor == 2.0 and chat.memory == ChatConfig.memory


def test_every_setting_has_a_flag_and_help_from_its_docstring():
    docs = field_docs(ServeConfig)
    assert docs["max_body_bytes"].startswith("Largest request body")
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for field in dataclasses.fields(ServeConfig):
        assert "--" + field.name.replace("_", "-") in help_text, field.name
        assert field.name in docs, f"ServeConfig.{field.name} has no docstring"


def test_inherited_settings_keep_their_docstrings():
    docs = field_docs(ChatConfig)
    assert docs["top_p"].startswith("Sample only from")  # from GenerationConfig
    assert "chat answers requests" in docs["ret_scale_factor"]  # ChatConfig's own wins


def test_one_flag_vocabulary():
    """Issue #16: -v only worked before the subcommand; --out/--output-dir/--save named one idea;
    `serve --max-images` meant images in, the request's `max_images` images out."""
    import pytest

    parser = build_parser()
    assert parser.parse_known_args(["train", "-v"])[0].verbose is True
    assert parser.parse_args(["caption", "a.png", "-v"]).verbose is True
    assert parser.parse_args(["chat", "--out", "t.html"]).save == "t.html"
    assert parser.parse_args(["demo", "--out", "d.html"]).save == "d.html"
    assert parser.parse_known_args(["train", "--out", "runs/x"])[1] == ["--out", "runs/x"]  # tyro's
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-images", "3"])
