"""Downstream evaluation of a frozen encoder: embedding extraction, linear probes and plots.

:mod:`~asit.eval.extract` embeds the clips of a manifest with an :class:`asit.encoder.AudioEncoder`,
:mod:`~asit.eval.linear_probe` trains and scores linear classifiers on those embeddings, and
:mod:`~asit.eval.plots` draws training curves and per-class results. Loading encoders lives in
:mod:`asit.encoder`, fine-tuning in :mod:`asit.finetune`.
"""
