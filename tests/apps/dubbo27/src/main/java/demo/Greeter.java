package demo;

/** The service: greets {@code name}, saying which provider answered and whom it saw calling. */
public interface Greeter {
    String hello(String name);
}
