"""A bare FastAPI endpoint: the baseline the polling benchmark compares the status endpoint with."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}
