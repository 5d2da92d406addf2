//! The asynchronous job routes in the OpenAPI document: `/v1/jobs…` and the Workers AI
//! `queueRequest` mode of the run routes.

use serde_json::json;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, Parameter, ParameterBuilder, ParameterIn, PathsBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, PathItem, Required, Response};

use super::{json_body, json_response, reference, with_errors, with_security as secured};

/// `?queueRequest=true` on the run routes.
pub(super) fn queue_request_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("queueRequest")
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(
            "`true`: store the request as a job and answer its `request_id` at once; POST \
             `{\"request_id\"}` to the same route to poll (the PNG once done)",
        ))
        // a string enum rather than a boolean: what the server reads is the text
        .schema(Some(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["true", "false"]))))
        .build()
}

/// `Idempotency-Key` on the routes that store a job.
pub(super) fn idempotency_key_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "The same key with the same body answers the job stored the first time (while it \
             exists); with another body: 409 (code 3042). Per API key.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some("^[!-~]+$")),
        ))
        .build()
}

/// The answer to an `Idempotency-Key` reused for another body.
pub(super) fn key_reused(error: &dyn Fn(&str) -> Response) -> Response {
    error("The Idempotency-Key was used for another body (code 3042)")
}

/// `/v1/jobs` and `/v1/jobs/{id}[/image]`.
pub(super) fn add_paths(paths: PathsBuilder, auth: bool, png: &Response) -> PathsBuilder {
    let id = || {
        ParameterBuilder::new()
            .name("id")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
    };
    let job = || json_response("The job", reference("Job"));
    let error = |description: &str| json_response(description, reference("ErrorEnvelope"));
    // the answers of the routes that read a stored job
    let reading = |operation: OperationBuilder| {
        let mut operation = operation
            .parameter(id())
            .response("400", error("An id that is not valid UTF-8 (code 5006)"))
            .response("404", error("No job with that id, or it expired (code 7003)"))
            .response("500", error("The job store failed (code 3030)"))
            .response("503", error("The job store is unreachable; retry after `Retry-After` seconds (code 3040)"));
        if auth {
            operation = operation.response("401", error("Missing or unknown bearer token (code 10000)"));
        }
        secured(operation, auth).build()
    };
    let submit = secured(
        with_errors(
            OperationBuilder::new()
                .operation_id(Some("jobs_submit"))
                .summary(Some("Store a generation as a job; answers at once"))
                .request_body(Some(json_body(
                    "RunRequest",
                    json!({"prompt": "cyberpunk cat", "num_steps": 4, "guidance": 0, "seed": 42}),
                )))
                .parameter(idempotency_key_parameter())
                .response("202", job())
                .response("404", error("The server runs without a job store (code 7003)"))
                .response("409", key_reused(&error)),
            "ErrorEnvelope",
            auth,
        ),
        auth,
    )
    .build();
    let status = reading(OperationBuilder::new().operation_id(Some("jobs_get")).response("200", job()));
    let cancel = reading(
        OperationBuilder::new()
            .operation_id(Some("jobs_delete"))
            .summary(Some("Cancel and delete a job"))
            .response("200", json_response("Gone", reference("Deleted"))),
    );
    let image = reading(
        OperationBuilder::new()
            .operation_id(Some("jobs_image"))
            .summary(Some("The PNG of a done job; a failed job's error"))
            .response("200", png.clone())
            .response("409", error("Not done yet (code 3041)"))
            .response("408", error("The job failed: it ran past its deadline (code 3007)"))
            .response("503", error("The job failed: its server shut down (code 3040)")),
    );
    let mut item = PathItem::new(HttpMethod::Get, status);
    item.delete = Some(cancel);
    paths
        .path("/v1/jobs", PathItem::new(HttpMethod::Post, submit))
        .path("/v1/jobs/{id}", item)
        .path("/v1/jobs/{id}/image", PathItem::new(HttpMethod::Get, image))
}

/// The run routes' 200: the PNG, or JSON for a queued request or an unfinished poll.
pub(super) fn run_answer(png: &Response) -> Response {
    let mut answer = png.clone();
    answer.description = "The generated image; with `queueRequest=true`, or polling an unfinished job, the \
                          job's status"
        .into();
    answer
        .content
        .insert("application/json".into(), ContentBuilder::new().schema(Some(reference("QueuedEnvelope"))).build());
    answer
}
