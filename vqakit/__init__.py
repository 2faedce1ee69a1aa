"""vqakit: Visual Question Answering with pretrained towers, fusion, Lightning training and official evaluation."""

__version__ = "0.1.0"
