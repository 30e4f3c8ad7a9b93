import io
import re
from pathlib import Path

import pytest

from fromage.apps.chat import Conversation, parse_line
from fromage.apps.transcript import to_html
from fromage.pipeline import RetrievedImage

from .test_pipeline import bot  # noqa: F401  (fixture)
from .test_train import tiny_world  # noqa: F401  (fixture)


def test_parse_line_places_images_where_they_appear():
    assert parse_line('what is @cat.png next to @"my dog.jpg"?') == [
        "what is",
        Path("cat.png"),
        "next to",
        Path("my dog.jpg"),
        "?",
    ]
    assert parse_line("  plain text ") == ["plain text"]
    assert parse_line("@a.png") == [Path("a.png")]


def test_conversation_feeds_answers_back_and_never_repeats_an_image(bot):  # noqa: F811
    fromage, photos = bot
    for memory in (0, 1):
        chat = Conversation(fromage, memory=memory, max_new_tokens=4, ret_scale_factor=1e6, max_rets=1)
        first = [p for p in chat.ask(["a red circle"]) if isinstance(p, list)]
        second = [p for p in chat.ask(["a red circle"]) if isinstance(p, list)]
        assert len(first) == len(second) == 1
        assert first[0][0].row != second[0][0].row  # shown once: never retrieved again
        assert [t.role for t in chat.turns] == ["user", "assistant", "user", "assistant"]
        prompt = chat.prompt(["more"])
        if memory == 0:
            assert prompt == ["more"]
        else:  # the last exchange (user, answer with its image), then the new message
            assert Path(second[0][0].path) in prompt and Path(first[0][0].path) not in prompt
            assert prompt[0] == "a red circle" and prompt[-1] == "more" and prompt.count("\n") == 2
    with pytest.raises(ValueError, match="no text and no image"):
        list(chat.ask([]))


def test_html_transcript_inlines_every_image(bot):  # noqa: F811
    fromage, photos = bot
    image = sorted(photos.glob("*.png"))[0]
    chat = Conversation(fromage, max_new_tokens=3, ret_scale_factor=1e6)
    list(chat.ask([image, "a <b>red</b> circle"]))
    html = to_html(chat.turns)
    retrieved = [i for t in chat.turns for i in t.items if isinstance(i, RetrievedImage)]
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 1 + len(retrieved)
    assert "&lt;b&gt;red&lt;/b&gt;" in html and "<b>red" not in html  # text is escaped


def test_cli_chat_reads_stdin_and_saves_html(bot, tmp_path, monkeypatch, capsys):  # noqa: F811
    from fromage.cli import main

    fromage, photos = bot
    checkpoint = photos.parent / "run" / "checkpoint"
    image = sorted(photos.glob("*.png"))[0]
    lines = f"a red circle @{image}\n@{tmp_path / 'missing.png'}\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    out_html = tmp_path / "t.html"
    argv = ["chat", "--model", str(checkpoint), "--index", str(photos.parent / "idx")]
    assert main([*argv, "--save", str(out_html), "--ret-scale-factor", "1e6", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "[image " in captured.out
    assert "missing.png" in captured.err  # a bad attachment is reported; the chat goes on
    assert out_html.read_text().count("data:image/png;base64,") >= 2


def test_memory_minus_one_keeps_every_exchange_that_fits_the_context(bot, monkeypatch):  # noqa: F811
    fromage, _ = bot
    chat = Conversation(fromage, memory=-1, max_new_tokens=4)
    for i in range(3):
        chat.add("user", [f"question {i}"])
        chat.add("assistant", [f"answer {i}"])
    everything = chat.prompt(["next"])
    assert everything[0] == "question 0" and everything[-1] == "next"  # all three exchanges
    # A context that holds the new message, the answer and one exchange: the oldest two go.
    one = fromage.count_tokens(chat.prompt(["next"])[-5:])
    monkeypatch.setattr(fromage.model.lm, "max_positions", one + 4)
    assert chat.prompt(["next"]) == ["question 2", "\n", "answer 2", "\n", "next"]
    monkeypatch.setattr(fromage.model.lm, "max_positions", one + 3)  # not even that: none
    assert chat.prompt(["next"]) == ["next"]


def test_memory_below_minus_one_is_refused(bot):  # noqa: F811
    with pytest.raises(ValueError, match="memory must be >= -1"):
        Conversation(bot[0], memory=-2)
