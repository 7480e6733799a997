"""The de-identification pipeline: identity saliency -> patch blocking -> compensation."""
