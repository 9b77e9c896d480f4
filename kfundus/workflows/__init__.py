"""Recipes that call the engine, one per command that trains: supervised training
(``supervised``), RET-CLIP pre-training (``pretrain``), the transfer study (``transfer``),
a sweep over settings (``sweep``) and the demo (``demo``). None has a training loop of its
own."""
