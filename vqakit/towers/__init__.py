"""Towers: pretrained unimodal encoders behind one small interface."""
