"""Behaviour: generation, refusal judges, layer bypass, similarity and perplexity, and the behave / defend jobs."""
