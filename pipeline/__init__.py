"""The open pipeline from web-scale image–caption data to trained DALL-E style priors."""

__version__ = "0.1.0"
