"""Turning labelled tickets into a routing model: splits, fine-tuning, export and evaluation."""
