"""Plain-torch drafter definitions, frozen-dataclass configs, checkpoint I/O, and the
embedded default target model (``targets``)."""
