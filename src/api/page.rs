//! The browser page, embedded in the binary: it works from the single binary and in a
//! container, with no CDN and no internet.

use actix_web::{HttpResponse, web};

use super::ApiError;
use super::error::ErrorBody;

const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../static/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../static/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../static/app.css"),
    ),
];

fn serve(name: &str) -> Result<HttpResponse, ApiError> {
    let (_, mime, body) = FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| ApiError::NotFound(format!("no static file {name:?}")))?;
    Ok(HttpResponse::Ok()
        .content_type(*mime)
        .insert_header(("Cache-Control", "no-cache"))
        .body(*body))
}

/// The browser page (open: it signs in with `POST /session`).
#[utoipa::path(
    get,
    path = "/",
    operation_id = "page",
    tag = "server",
    security(()),
    responses((status = 200, description = "The page", content_type = "text/html", body = String))
)]
pub async fn index() -> Result<HttpResponse, ApiError> {
    serve("index.html")
}

/// The page's script and style sheet.
#[utoipa::path(
    get,
    path = "/static/{file}",
    operation_id = "static_file",
    tag = "server",
    security(()),
    params(("file" = String, Path, description = "`index.html`, `app.js` or `app.css`")),
    responses(
        (status = 200, description = "The file", content(
            (String = "text/javascript"), (String = "text/css"), (String = "text/html"))),
        (status = 404, description = "No such file", body = ErrorBody),
    )
)]
pub async fn file(path: web::Path<String>) -> Result<HttpResponse, ApiError> {
    serve(&path)
}
