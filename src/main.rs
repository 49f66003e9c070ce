//! The `audience` binary: parses the command line and hands it to [`audience::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = audience::cli::Cli::from_command_line();
    match audience::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
