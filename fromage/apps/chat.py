"""A dialogue over `Fromage`: turns of text and images in, text and retrieved images out.

Each turn's prompt is the earlier exchanges (user items, the model's answers and the images it
retrieved, fed back as images) and then the new message, separated by newlines: the last
`memory` exchanges, or with `memory=-1` every exchange that fits the LM's context together with
the answer; the oldest go first. The ship recipe trains `[RET]` on requests after earlier turns
(training/tasks.py), but the shipped model still retrieves worse after them, so `memory`
defaults to 0 (`ChatConfig` gives the figures). Images already shown in the conversation are
never retrieved again. Answers end at a newline.

`ChatConfig` holds every setting of a conversation with its one default; the terminal chat
(`fromage chat`, `run_terminal`), the web demo and the scripted demo all start from it. The
terminal syntax lives here too: `@path` (or `@"path with spaces"`) attaches an image file where
it appears in the line; /save FILE, /reset and /quit are commands.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from PIL import Image

from ..config import ChatConfig
from ..data.images import ImageError
from ..pipeline import Fromage, PromptItem, RetrievedImage, add_piece
from .transcript import Item, Turn, save_html

_ATTACH = re.compile(r'@"([^"]+)"|@(\S+)')


def parse_line(line: str) -> list[str | Path]:
    """'what is @cat.png next to @"my dog.jpg"?' → ["what is", Path("cat.png"), "next to",
    Path("my dog.jpg"), "?"] (text stripped, empty pieces dropped)."""
    items: list[str | Path] = []
    position = 0
    for match in _ATTACH.finditer(line):
        text = line[position : match.start()].strip()
        if text:
            items.append(text)
        items.append(Path(match.group(1) or match.group(2)))
        position = match.end()
    text = line[position:].strip()
    if text:
        items.append(text)
    return items


class Conversation:
    def __init__(self, bot: Fromage, memory: int = ChatConfig.memory, **generation: Any):
        """`memory`: earlier exchanges (user + answer) each prompt includes; `generation`:
        `GenerationConfig` overrides for every answer (a newline stop is added)."""
        if memory < -1:
            raise ValueError(f"memory must be >= -1 (-1: as many as fit), got {memory}")
        self.bot = bot
        self.memory = memory
        self.turns: list[Turn] = []
        stop = tuple(generation.pop("stop", ()))
        self.generation = {**generation, "stop": (*stop, "\n")}

    def prompt(self, user: list[str | Path | Image.Image]) -> list[PromptItem]:
        """The conversation so far plus the new user items, as one prompt: the turns `memory`
        allows, newest first, as long as they fit the LM's context with the new message and
        the answer (token counts add up item by item: each piece is tokenised on its own)."""
        new = Turn("user", list(user))
        if self.memory == 0:
            return _joined([new])
        history = self.turns if self.memory == -1 else self.turns[-2 * self.memory :]
        limit = self.bot.max_positions
        if limit is None:
            return _joined([*history, new])
        answer = int(self.generation.get("max_new_tokens", self.bot.generation.max_new_tokens))
        budget = limit - answer - self.bot.count_tokens(_joined([new]))
        newline = self.bot.count_tokens(["\n"]) - 1  # the separator before each turn ([BOS] aside)
        kept = 0
        for turn in reversed(history):
            budget -= self.bot.count_tokens(turn.items) - 1 + newline if turn.items else newline
            if budget < 0:
                break
            kept += 1
        while kept and history[len(history) - kept].role == "assistant":
            kept -= 1  # an answer without its question does not start the prompt
        return _joined([*history[len(history) - kept :], new])

    def ask(self, user: list[str | Path | Image.Image]) -> Iterator[str | list[RetrievedImage]]:
        """Stream the answer to one user turn; the turn and the answer join the history once
        the answer is complete."""
        if not user:
            raise ValueError("the message has no text and no image")
        answer: list[Item] = []
        shown = {i.row for t in self.turns for i in t.items if isinstance(i, RetrievedImage)}
        for piece in self.bot.stream(self.prompt(user), exclude=shown, **self.generation):
            add_piece(answer, piece)
            yield piece
        self.turns += [Turn("user", list(user)), Turn("assistant", answer)]

    def add(self, role: str, items: list[Item]) -> None:
        """Record a turn that did not come from `ask` (e.g. a caption shown as an answer)."""
        self.turns.append(Turn(role, items))


def _joined(turns: list[Turn]) -> list[PromptItem]:
    """Turns as one prompt: their items, newline-separated, retrieved images as their files."""
    items: list[PromptItem] = []
    for turn in turns:
        if items:
            items.append("\n")
        for item in turn.items:
            items.append(Path(item.path) if isinstance(item, RetrievedImage) else item)
    return items


def run_terminal(
    bot: Fromage,
    config: ChatConfig,
    save: str = "",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> None:
    """The `fromage chat` loop: a message per line on stdin, the answer streamed to stdout
    (retrieved images as `[image PATH | caption | score]` lines); prompts and notes on stderr.
    Streams default to the process's current ones, looked up per call."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    chat = Conversation(bot, **asdict(config))
    interactive = stdin.isatty()
    if interactive:
        print("fromage chat: @path attaches an image; /save FILE, /reset, /quit", file=stderr)
    while True:
        if interactive:
            print("you> ", end="", file=stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.turns.clear()
            continue
        if line.startswith("/save"):
            target = line[len("/save") :].strip() or save or "transcript.html"
            print(f"saved {save_html(chat.turns, target)}", file=stderr)
            continue
        print("fromage> ", end="", file=stdout, flush=True)
        try:
            for piece in chat.ask(parse_line(line)):
                _print_piece(piece, stdout)
        except (ImageError, ValueError) as error:  # a bad attachment ends the turn, not the chat
            print(f"\nerror: {error}", file=stderr)
        print(file=stdout)
    if save:
        print(f"saved {save_html(chat.turns, save)}", file=stderr)


def _print_piece(piece: str | list[RetrievedImage], out: TextIO) -> None:
    if isinstance(piece, str):
        out.write(piece)
    else:
        for img in piece:
            out.write(f"\n  [image {img.path} | {img.caption} | score {img.score:.2f}]\n")
    out.flush()
