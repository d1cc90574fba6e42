"""Text from a trained model: ``megatron-lc generate`` (continue a prompt, sharded over the ranks under torchrun)
and ``megatron-lc chat`` (a ChatML conversation). An app over the library: model, checkpoint, data, parallel."""
