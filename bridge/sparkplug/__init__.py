"""Sparkplug B 3.0 host application: the pure core (topics, payloads, host state, mapping)."""
