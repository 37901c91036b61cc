"""Stages that exist only in tests, to exercise the artifact store through the real runner.

`echo` writes its `text` option to out.txt (after its input's text, when it has one); `sleep` makes it
slow enough to be killed mid-run; `fail` makes it raise.
"""

from __future__ import annotations

import time

from llmctl.stages.registry import STAGES, InputSlot, Stage

ECHO = Stage(
    name="echo",
    description="test stage",
    output_kind="text",
    sections=(),
    inputs=(InputSlot("upstream", ("text",), (), required=False),),
    module="stage_fixtures",
)
SINK = Stage(
    name="sink",
    description="test stage consuming echo",
    output_kind="text",
    sections=(),
    inputs=(InputSlot("upstream", ("text",), ("echo",)),),
    module="stage_fixtures",
)


def install() -> None:
    for stage in (ECHO, SINK):
        STAGES.setdefault(stage.name, stage)


def run(ctx) -> dict:
    options = ctx.options
    text = options.get("text", "hello")
    upstream = ctx.inputs.get("upstream")
    if upstream is not None:
        text = (upstream.path / "out.txt").read_text() + text
    (ctx.output_dir / "partial.txt").write_text(text)
    deadline = time.monotonic() + float(options.get("sleep", 0))
    while time.monotonic() < deadline:
        time.sleep(0.02)
    if options.get("fail"):
        raise RuntimeError("echo stage asked to fail")
    (ctx.output_dir / "out.txt").write_text(text)
    return {"chars": len(text), "upstream_id": ctx.input_ids.get("upstream")}
