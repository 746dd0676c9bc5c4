"""Names of the prefill's profiler regions (``torch.profiler.record_function``), shared by the model
code that marks them and :mod:`llava.bench.prefill_profile` that reports them."""

from __future__ import annotations

PROFILE_REGIONS = {
    "vision": "duet::vision_towers",
    "v2v": "duet::v2v",
    "merge": "duet::merge",
    "llm": "duet::llm_layers",
    "t2v_scoring": "duet::t2v_scoring",
    "t2v_compaction": "duet::t2v_compaction",
    "lm_head": "duet::lm_head",
}
"""Region key -> label. ``v2v`` lies inside ``vision``; the others do not overlap."""
