//! `GET /`: the playground page, and its script and style sheet. Hand-written files embedded
//! in the binary, so the page works offline and needs nothing beside the server.

use axum::http::header;
use axum::response::{Html, IntoResponse};

pub async fn page() -> Html<&'static str> {
    Html(include_str!("../playground/index.html"))
}

pub async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("../playground/app.js"))
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../playground/style.css"))
}
