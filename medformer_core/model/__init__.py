"""The Medformer: blocks, patches, the encoder and the multitask model with its task outputs."""
