"""The peer row of the load benchmark: the same endpoint in FastAPI, one background task
per response (an async function, as Starlette runs it after the response is sent)."""

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()
ran = 0


async def bump() -> None:
    global ran
    ran += 1


@app.get("/", response_class=PlainTextResponse)
async def hello(background_tasks: BackgroundTasks) -> str:
    background_tasks.add_task(bump)
    return "Hello, World!"
