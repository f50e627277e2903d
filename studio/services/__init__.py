"""Business logic of the studio: no gradio here, persistence only through `storage.crud`.

`Services` bundles one instance of each service around a shared `Database` and `Settings`;
`app.py` builds it once and hands it to the UI, the CLI and (later) the REST API.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.db import Database
from studio.services.annotation import AnnotationService
from studio.services.arena import ArenaService
from studio.services.datasets import DatasetService
from studio.services.errors import ServiceError
from studio.services.generate import GenerationService
from studio.services.jobs import JobService
from studio.services.projects import ProjectService
from studio.services.prompts import PromptService
from studio.services.quality import QualityService
from studio.services.rm_agreement import RMAgreementService
from studio.services.users import UserService
from studio.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    projects: ProjectService
    prompts: PromptService
    generation: GenerationService
    users: UserService
    annotation: AnnotationService
    quality: QualityService
    datasets: DatasetService
    jobs: JobService
    arena: ArenaService
    rm_agreement: RMAgreementService

    @classmethod
    def build(cls, settings: Settings, db: Database) -> Services:
        prompts = PromptService(db, settings)
        users = UserService(db, settings)
        generation = GenerationService(db, settings)
        return cls(
            settings=settings,
            db=db,
            projects=ProjectService(db, settings, prompts),
            prompts=prompts,
            generation=generation,
            users=users,
            annotation=AnnotationService(db, settings, users),
            quality=QualityService(db, settings, users),
            datasets=DatasetService(db, settings, users),
            jobs=JobService(db, settings, users),
            arena=ArenaService(db, settings, users, generation),
            rm_agreement=RMAgreementService(db, settings, users),
        )


__all__ = ["ServiceError", "Services"]
