"""DALL-E's dVAE (stage one): the model (``model``), OpenAI's published weights (``openai``), image streaming for
training (``data``), the trainer (``train``) and held-out evaluation (``eval``).
"""
