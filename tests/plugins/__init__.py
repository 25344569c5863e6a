"""Tiny plug-ins the tests name by `_target_`, as a user's own package would."""
