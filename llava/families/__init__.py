"""Model families (LLaVA-1.5 / Video-LLaVA, Qwen2.5-VL) behind one interface, and the registry that picks one.

:mod:`llava.families.base` states what a family decides, :mod:`llava.families.registry` reads a checkpoint's
``model_type`` and returns its family, :mod:`llava.families.names` holds every family's names (no torch: what the
launch scripts ask); each family is one module here.
"""
