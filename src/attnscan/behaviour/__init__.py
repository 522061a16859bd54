"""Behaviour: generation, refusal judges, layer bypass, similarity and perplexity, and the behave / defend jobs.

Modules: :mod:`.generation` (greedy batched generation), :mod:`.judges` (refusal phrases, classifier judge, Wilson
intervals), :mod:`.judge_check` (a judge scored against the packaged hand-labelled responses), :mod:`.runs` (JSONL
records, run description, progress across stages), :mod:`.behave` (the behave job), :mod:`.bypass` (layer bypass
hooks), :mod:`.similarity` (chrF, token F1), :mod:`.perplexity`, :mod:`.layers` (layers chosen from scan and
detector outputs), :mod:`.arms` (one model variant of a defence run) and :mod:`.defend` (the defend job and the
sweep).
"""
