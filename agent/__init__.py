"""Edge-server side: tail service, coordinator and service placement."""
