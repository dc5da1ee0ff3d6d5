"""The Flower runtime: Flower orchestrates the rounds, the body channel carries split training.

`server_app.app` and `client_app.app` are the components `flwr run .` starts (see pyproject.toml);
they run the same round loop (`runner.run`), client phases (`client.Client`) and body server
(`server.BodyServer`) as the in-process runtime, with messages on the wire instead of in memory.
"""
