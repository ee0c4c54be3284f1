"""The programs: interactive chat, batch completion, sizing, and the ``llama-gen`` command."""
