"""`fromage demo-web`: a Gradio chat over one `Fromage` pipeline. No model logic here.

Built on `gr.ChatInterface` (multimodal): a person types and attaches images, the answer
streams in with retrieved images beneath their caption and score, and Gradio provides Stop,
Retry, Undo, Clear and clickable examples. The settings follow the published FROMAGe demo: how
readily to return images (`ret_scale_factor`), images per answer, answer length, temperature
and top-p. Each prompt reads the conversation so far (`Conversation`, memory on).

Files: Gradio serves only what is under `allowed_paths`. Instead of opening the folders an
index came from (which would expose their other files, and cannot reach images inside tar
shards), each image an answer shows is copied byte for byte into one export folder, named by
its content digest; that folder is the only one allowed. Fed back in a later prompt, the copy
has the indexed image's digest, so it counts as already shown and is never retrieved again.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.multimodal_textbox import MultimodalValue

from ..config import ChatConfig
from ..data.shards import read_member, split_tar_ref
from ..pipeline import Fromage, RetrievedImage, add_piece
from .chat import Conversation, Turn
from .transcript import save_html

DEFAULTS = ChatConfig()
"""The settings panel starts at the chat's defaults."""
_SCORE_LINE = re.compile(r"^\*.*\* · score -?\d+\.\d+$")
"""The caption line shown under a retrieved image: display only, never read back as text."""
NO_ANSWER = "(no answer)"
"""Shown when the model answered nothing; not read back as its answer."""


class ExportFolder:
    """Byte-for-byte copies of the images the chat shows, in the one folder Gradio may serve."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="fromage-web-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._copies: dict[str, Path] = {}  # source → its copy (an answer re-renders per piece)

    def add(self, source: str | Path) -> Path:
        """A copy of a file or a shard member (`shard.tar#member`), named by its SHA-1."""
        known = self._copies.get(str(source))
        if known is not None and known.exists():
            return known
        member = split_tar_ref(source)
        data = read_member(*member) if member else Path(source).read_bytes()
        name = member[1] if member else str(source)
        dest = self.root / f"{hashlib.sha1(data).hexdigest()}{Path(name).suffix.lower() or '.png'}"
        if not dest.exists():
            with tempfile.NamedTemporaryFile(dir=self.root, suffix=".tmp", delete=False) as tmp:
                tmp.write(data)
            Path(tmp.name).replace(dest)
        self._copies[str(source)] = dest
        return dest


def answer_messages(items: list[Any], export: ExportFolder) -> list[dict[str, Any]]:
    """An answer's pieces → Gradio messages: text, and each retrieved image (its exported copy)
    followed by its caption (or file name) and score."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            if item.strip():
                out.append({"role": "assistant", "content": item})
        elif isinstance(item, RetrievedImage):
            copy = export.add(item.path)
            # A folder index has no captions: the file's name says what was found.
            label = item.caption or Path(item.path.split("#")[-1]).stem
            out.append({"role": "assistant", "content": {"path": str(copy), "alt_text": label}})
            out.append({"role": "assistant", "content": f"*{label}* · score {item.score:.2f}"})
    return out


def history_turns(history: list[dict[str, Any]]) -> list[Turn]:
    """Gradio's history (messages whose content is a string, a file, or a list of text and file
    parts) → conversation turns: consecutive messages of one role are one turn; files become
    image paths; the caption lines under retrieved images are left out."""
    turns: list[Turn] = []
    for message in history:
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        items: list[Any] = []
        for part in parts:
            if isinstance(part, str):
                text = part
            elif isinstance(part, dict) and part.get("type") == "text":
                text = str(part.get("text", ""))
            elif isinstance(part, dict):
                file = part.get("file", part)
                path = file.get("path") if isinstance(file, dict) else None
                if path:
                    items.append(Path(path))
                continue
            else:
                continue
            if text.strip() and text.strip() != NO_ANSWER and not _SCORE_LINE.match(text.strip()):
                items.append(text)
        role = message.get("role", "user")
        if turns and turns[-1].role == role:
            turns[-1].items.extend(items)
        else:
            turns.append(Turn(role, items))
    return turns


def build_ui(bot: Fromage, export: ExportFolder, examples: list[tuple[str, list[str]]] | None = None):
    def respond(message: dict[str, Any], history: list[dict[str, Any]], scale, n_images, n_tokens, temp, p):
        items: list[Any] = [Path(f if isinstance(f, str) else f["path"]) for f in message.get("files") or []]
        if (message.get("text") or "").strip():
            items.append(message["text"].strip())
        if not items:
            raise gr.Error("Type a message or attach an image.")
        chat = Conversation(
            bot,
            memory=DEFAULTS.memory,
            ret_scale_factor=float(scale),
            max_rets=1 if n_images else 0,
            images_per_ret=max(int(n_images), 1),
            max_new_tokens=int(n_tokens),
            temperature=float(temp),
            top_p=float(p),
        )
        chat.turns = history_turns(history)
        answer: list[Any] = []
        try:
            for piece in chat.ask(items):
                add_piece(answer, piece)
                yield answer_messages(answer, export)
        except ValueError as error:  # e.g. an unreadable image: say so, keep the chat
            raise gr.Error(str(error)) from None
        if not answer:
            yield [{"role": "assistant", "content": NO_ANSWER}]

    images = DEFAULTS.images_per_ret if DEFAULTS.max_rets else 0
    defaults = [
        DEFAULTS.ret_scale_factor,
        images,
        DEFAULTS.max_new_tokens,
        DEFAULTS.temperature,
        DEFAULTS.top_p,
    ]
    controls: list[str | gr.components.Component] = [
        gr.Slider(
            0.0,
            max(10000.0, DEFAULTS.ret_scale_factor),
            value=DEFAULTS.ret_scale_factor,
            label="ret_scale_factor (how readily images are returned)",
        ),
        gr.Slider(0, 4, value=images, step=1, label="max images per answer"),
        gr.Slider(1, 64, value=DEFAULTS.max_new_tokens, step=1, label="max words (tokens)"),
        gr.Slider(0.0, 1.5, value=DEFAULTS.temperature, step=0.05, label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="top-p"),
    ]
    # Made outside the Blocks (unrendered): ChatInterface places them itself.
    chatbot = gr.Chatbot(elem_id="chat", height=480, label="conversation")
    textbox = gr.MultimodalTextbox(
        elem_id="message",
        file_types=["image"],
        file_count="multiple",
        placeholder="Type a message, attach images (e.g. 'show me a red apple')",
        show_label=False,
    )
    settings = gr.Accordion("Settings", open=False)
    with gr.Blocks(title="fromage") as ui:
        chat = gr.ChatInterface(
            respond,
            multimodal=True,
            chatbot=chatbot,
            textbox=textbox,
            additional_inputs=controls,
            additional_inputs_accordion=settings,
            # With additional inputs, an example is a row: the message, then each setting's value.
            examples=[[MultimodalValue(text=t, files=f), *defaults] for t, f in examples]
            if examples
            else None,
            cache_examples=False,
            title="fromage: a frozen LM that reads images and answers with retrieved ones",
            stop_btn=True,
            fill_height=False,
        )
        save = gr.Button("Save conversation (HTML)", elem_id="save")
        saved = gr.File(label="transcript", interactive=False)

        def save_transcript(history: list[dict[str, Any]]) -> str:
            path = export.root / "transcripts" / f"conversation-{len(history)}.html"
            return str(save_html(history_turns(history), path, title="fromage conversation"))

        save.click(save_transcript, [chat.chatbot], [saved])
    return ui


def launch(
    checkpoint: str | Path,
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> tuple[Any, str]:
    """Start the web demo; returns (app, local URL). `block=False` returns at once."""
    from .demo import emoji_image, skimage_photo

    bot = Fromage.from_pretrained(checkpoint, index=index)
    export = ExportFolder()
    photo = export.add(skimage_photo("chelsea"))
    apple = export.add(emoji_image("twitter", "red apple"))
    examples = [
        ("show me a red apple", []),
        ("find me a banana", []),
        ("Describe this photo.", [str(photo)]),
        ("show me another fruit", [str(apple)]),
    ]
    ui = build_ui(bot, export, examples)
    _, url, _ = ui.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        allowed_paths=[str(export.root)],
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
    )
    return ui, url
