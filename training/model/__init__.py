"""The model: backbones (the registry), the Keras model built around one, and what each strategy freezes."""
