"""YAML configs, one per named variant; read by `zoo.registry` (installed as package data)."""
