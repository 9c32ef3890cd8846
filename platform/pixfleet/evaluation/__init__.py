"""What a ControlNet's outputs are worth: controllability and prompt alignment, per row."""
