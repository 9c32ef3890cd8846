"""pixfleet: controlled image generation (ControlNet, InstructPix2Pix) at dataset scale on Ray."""

__version__ = "0.1.0"
