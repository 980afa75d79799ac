"""Ray Serve application for the composite TMR model."""
