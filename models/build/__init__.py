"""Build toolchain (torch): backbone, token mapping, fine-tuning, pruning, split export."""


class BuildError(Exception):
    """Any build failure the user can fix: recipe, dataset, checkpoint or export."""
