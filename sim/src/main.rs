fn main() {
    eprintln!("sagamq-sim: TODO(issue 4)");
    std::process::exit(2);
}
