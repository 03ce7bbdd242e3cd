"""The engine: EngineCore (schedule -> execute -> update) and the clients around it."""
