"""SPCL (methods.md "SPCL"): self-paced contrastive pre-training of the encoder with meta-labels (`ssmis pretrain`),
and the `init.encoder` hook that starts any method's networks from such an encoder."""
