"""A loaded model's process: the protocol both sides speak, the API side's client, and, in the
runner, placement, the generate loop, the batch engine and the vision projector."""
