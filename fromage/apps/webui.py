"""`fromage demo-web`: a Gradio chat over one `Fromage` pipeline. No model logic here.

A person types and attaches images; the answer streams in, with retrieved images shown
beneath their caption and score. Controls follow the published FROMAGe demo: how readily to
return images (`ret_scale_factor`), images per answer, answer length, temperature and top-p.
Undo, Reset, Save (HTML with the images inlined) and clickable offline examples.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from ..config import ChatConfig
from ..pipeline import Fromage, RetrievedImage
from .chat import Conversation, Turn
from .transcript import save_html

DEFAULTS = ChatConfig()
"""The settings panel starts at the chat's defaults."""


def _messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Conversation turns → Gradio chat messages (one per text piece or image)."""
    out: list[dict[str, Any]] = []
    for turn in turns:
        for item in turn.items:
            if isinstance(item, str):
                if item.strip():
                    out.append({"role": turn.role, "content": item})
            elif isinstance(item, RetrievedImage):
                out.append({"role": turn.role, "content": {"path": item.path, "alt_text": item.caption}})
                out.append({"role": turn.role, "content": f"*{item.caption}* · score {item.score:.2f}"})
            elif isinstance(item, Path):
                out.append({"role": turn.role, "content": {"path": str(item)}})
    return out


def build_ui(bot: Fromage, examples: list[tuple[str, list[str]]] | None = None) -> gr.Blocks:
    with gr.Blocks(title="fromage") as ui:
        gr.Markdown("## fromage: a frozen LM that reads images and answers with retrieved ones")
        turns = gr.State([])
        chatbot = gr.Chatbot(elem_id="chat", height=480, label="conversation")
        box = gr.MultimodalTextbox(
            elem_id="message",
            file_types=["image"],
            file_count="multiple",
            placeholder="Type a message, attach images (e.g. 'show me a red apple')",
            show_label=False,
        )
        with gr.Row():
            undo = gr.Button("Undo", elem_id="undo")
            reset = gr.Button("Reset", elem_id="reset")
            save = gr.Button("Save conversation (HTML)", elem_id="save")
        saved = gr.File(label="transcript", visible=True, interactive=False)
        with gr.Accordion("Settings", open=False):
            ret_scale = gr.Slider(
                0.0,
                max(10000.0, DEFAULTS.ret_scale_factor),
                value=DEFAULTS.ret_scale_factor,
                label="ret_scale_factor (how readily images are returned)",
            )
            images = DEFAULTS.images_per_ret if DEFAULTS.max_rets else 0
            max_images = gr.Slider(0, 4, value=images, step=1, label="max images per answer")
            max_tokens = gr.Slider(1, 64, value=DEFAULTS.max_new_tokens, step=1, label="max words (tokens)")
            temperature = gr.Slider(
                0.0, 1.5, value=DEFAULTS.temperature, step=0.05, label="temperature (0 = greedy)"
            )
            top_p = gr.Slider(0.05, 1.0, value=DEFAULTS.top_p, step=0.05, label="top-p")
        if examples:
            gr.Examples([{"text": t, "files": f} for t, f in examples], inputs=box, label="examples")

        def respond(message, history, scale, n_images, n_tokens, temp, p):
            items: list[Any] = [Path(f) for f in message.get("files") or []]
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
            chat.turns = list(history)
            pending = [*history, Turn("user", items), Turn("assistant", [])]
            yield _messages(pending), history, gr.MultimodalTextbox(value=None, interactive=False)
            try:
                for piece in chat.ask(items):
                    answer = pending[-1].items
                    if isinstance(piece, str):
                        answer.append(piece)
                    else:
                        answer.extend(piece)
                    yield _messages(pending), history, gr.MultimodalTextbox(value=None, interactive=False)
            except ValueError as error:  # e.g. an unreadable image: say so, keep the chat
                raise gr.Error(str(error)) from None
            yield _messages(chat.turns), chat.turns, gr.MultimodalTextbox(value=None, interactive=True)

        controls = [ret_scale, max_images, max_tokens, temperature, top_p]
        box.submit(respond, [box, turns, *controls], [chatbot, turns, box])
        undo.click(lambda h: (_messages(h[:-2]), h[:-2]), [turns], [chatbot, turns])
        reset.click(lambda: ([], []), None, [chatbot, turns])

        def save_transcript(history):
            path = Path(tempfile.mkdtemp(prefix="fromage-")) / "conversation.html"
            return str(save_html(history, path, title="fromage conversation"))

        save.click(save_transcript, [turns], [saved])
    return ui


def launch(
    checkpoint: str | Path,
    index: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> tuple[gr.Blocks, str]:
    """Start the web demo; returns (app, local URL). `block=False` returns at once."""
    from ..paths import home
    from .demo import emoji_image, skimage_photo

    bot = Fromage.from_pretrained(checkpoint, index=index)
    photo = skimage_photo("chelsea")
    examples = [
        ("show me a red apple", []),
        ("find me a banana", []),
        ("Describe this photo.", [str(photo)]),
        ("show me another fruit", [str(emoji_image("twitter", "red apple"))]),
    ]
    ui = build_ui(bot, examples)
    roots = {str(home()), tempfile.gettempdir()}
    if bot.index is not None:
        roots |= {str(Path(m["path"]).parent) for m in bot.index.metadata[:1]}
    _, url, _ = ui.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        allowed_paths=sorted(roots),
        prevent_thread_lock=not block,
        show_error=True,
        quiet=not block,
    )
    return ui, url
