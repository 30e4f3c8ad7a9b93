"""The web demo's glue, without a browser: Gradio's history read back as conversation turns, and
the export folder that is the only one Gradio may serve."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from fromage.apps.chat import Turn
from fromage.apps.webui import ExportFolder, answer_messages, history_turns
from fromage.pipeline import RetrievedImage


def test_history_turns_reads_gradio_messages_back(tmp_path):
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/tmp/cat.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "show me a red apple"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "here"}]},
        {
            "role": "assistant",
            "content": [{"type": "file", "file": {"path": "/x/a.png"}, "alt_text": "red apple"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "*red apple* · score 0.53"}]},
        {"role": "user", "content": "show me another fruit"},
    ]
    assert history_turns(history) == [
        Turn("user", [Path("/tmp/cat.png"), "show me a red apple"]),
        Turn("assistant", ["here", Path("/x/a.png")]),  # the caption line is display only
        Turn("user", ["show me another fruit"]),
    ]


def test_answer_messages_show_exported_copies_with_captions(tmp_path):
    image = tmp_path / "index" / "sub" / "apple.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\x89PNG fake bytes")
    export = ExportFolder(tmp_path / "export")
    found = RetrievedImage(str(image), "red apple", 0.5312, 7)
    messages = answer_messages(["here is one", found], export)
    copy = Path(messages[1]["content"]["path"])
    assert copy.parent == export.root and copy.read_bytes() == image.read_bytes()
    assert copy.name == hashlib.sha1(image.read_bytes()).hexdigest() + ".png"
    assert messages[2]["content"] == "*red apple* · score 0.53"
    # Read back, the caption line is dropped and the copy stands for the image.
    assert history_turns(messages) == [Turn("assistant", ["here is one", copy])]


def test_export_folder_copies_shard_members(tmp_path):
    shard = tmp_path / "00000.tar"
    data = b"GIF89a fake"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("000001.gif")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    copy = ExportFolder(tmp_path / "export").add(f"{shard}#000001.gif")
    assert copy.read_bytes() == data and copy.suffix == ".gif"
