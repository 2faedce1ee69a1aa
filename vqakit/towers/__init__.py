"""Towers: pretrained unimodal encoders behind one small interface, and the processor that prepares their inputs."""
